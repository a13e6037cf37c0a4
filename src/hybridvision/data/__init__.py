"""hybridvision.data"""
