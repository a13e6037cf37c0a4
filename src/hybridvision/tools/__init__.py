"""hybridvision.tools"""
